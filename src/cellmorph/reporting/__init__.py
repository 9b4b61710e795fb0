"""What a person reads: report.html and plots, run-folder outputs (dose-response), summaries over
seeds and runs, explanations (activation maximisation, Grad-CAM)."""
