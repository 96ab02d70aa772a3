"""Studies: many runs of one method x hyperparameters x seeds (`pack`: K runs trained together)."""
