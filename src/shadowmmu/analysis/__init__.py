"""``shadowmmu.analysis``: measurements, cost models, comparisons, reports and plots."""
