"""Evaluations of trained sparse coders."""
