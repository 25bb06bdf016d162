"""lowmag.train: distill-train (teacher, baselines, distillation, evaluation). Needs torch."""
