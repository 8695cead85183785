"""Objective evaluation of vocoded audio against the ground truth."""
