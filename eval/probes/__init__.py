"""Probes on frozen features (or raw pixels): linear classification, later segmentation etc."""
