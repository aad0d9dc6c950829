"""Shared test helpers: configs and commands, map stores and checkpoints, fields, flow checks, cosmologies.

Fixtures that wrap them live in ``tests/conftest.py``; test files import the plain functions from here.
"""
