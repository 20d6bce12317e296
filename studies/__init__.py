"""Studies: multi-seed experiments built on krpo's own commands (see docs/results.md)."""
