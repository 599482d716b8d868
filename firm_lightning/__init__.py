"""FIRM on PyTorch Lightning."""
