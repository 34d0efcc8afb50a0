"""TransFIRA: transfer learning for face image recognizability assessment (IEEE FG 2026)."""

__version__ = "0.1.0"
__all__ = ["Predictor"]


def __getattr__(name: str):
    """``transfira.Predictor`` imported on first use, so ``import transfira`` stays light (no torch)."""
    if name == "Predictor":
        from .predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'transfira' has no attribute '{name}'")
