"""Serving what was trained: ``zhilu serve`` (an OpenAI-compatible server), ``zhilu generate``."""
