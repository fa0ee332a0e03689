"""Stages that check the embedded models (filled in below the training stages' launch)."""
STAGES: dict = {}
