"""matcaps: Matrix Capsules with EM Routing (Hinton, Sabour & Frosst, ICLR 2018) in PyTorch."""

__version__ = "0.1.0"
