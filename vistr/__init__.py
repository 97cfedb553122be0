"""VisTR: end-to-end video instance segmentation with Transformers (pure PyTorch library).

This package never imports Ray or MLflow; ``pipelines/`` composes it with them.
"""

__version__ = "0.1.0"
