"""Supervised fine-tuning (flow matching) on one or several episode datasets."""
