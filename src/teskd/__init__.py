"""teskd: Teacher Evolution via Self-Knowledge Distillation (arXiv 2110.00329)."""

__version__ = "0.1.0"
