"""Procedural RGB-D scenes with exact metric depth, the synthetic camera process and the demo."""
