"""Few-step students: progressive distillation (Salimans & Ho 2022) and guidance distillation
(Meng et al. 2023), trained by the one training loop and saved as stock diffusers pipelines."""
