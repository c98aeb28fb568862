"""slsr-ray: Sparse Label Smoothing Regularization for person re-identification on Ray."""

__version__ = "0.1.0"
