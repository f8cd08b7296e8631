"""Evaluation: the one evaluation loop (the trainer's validation and the evaluate command), its reports and
figures."""
