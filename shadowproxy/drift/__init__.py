"""Drift monitoring: baseline profiles of the training inputs and the live window compared with them (PSI, KS)."""
