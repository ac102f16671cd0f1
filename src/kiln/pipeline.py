"""Stages in order, and the rule that a stage finished with the same config is not run again."""
