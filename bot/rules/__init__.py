"""The rule language: loading and checking, the pure engine, templates, hot reload, dry run."""
