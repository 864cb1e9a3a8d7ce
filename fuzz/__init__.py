"""Fuzzing support shared by the atheris harnesses (fuzz/fuzz_*.py, run by bin/fuzz) and the hypothesis
property tests (tests/test_fuzz_properties.py): structure-aware mutators and seed builders."""
