"""TransFIRA: transfer learning for face image recognizability assessment (IEEE FG 2026)."""

__version__ = "0.1.0"
