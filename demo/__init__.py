"""The demo model's synthetic-shapes data and its training script; the trained weights live in demo_model/."""
