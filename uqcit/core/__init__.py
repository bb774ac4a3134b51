"""Core: stage configs and their allow-list, the result shape, file I/O and shared names.

Imports nothing else of the workbench; every other layer builds on it.
"""
