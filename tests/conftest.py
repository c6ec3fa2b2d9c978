"""Shared test set-up: torch single-threaded, so runs are stable on 2 cores."""

import torch

torch.set_num_threads(1)
