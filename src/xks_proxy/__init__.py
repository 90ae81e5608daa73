"""xks-proxy: an AWS KMS External Key Store proxy for PKCS#11 HSMs."""

__version__ = "0.1.0"
PRODUCT_NAME = "xks-proxy"
