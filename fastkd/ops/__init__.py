"""Autograd Functions, argument checks and dispatch for each op family."""
