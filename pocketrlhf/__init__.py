"""pocketrlhf: SFT, reward modelling, PPO and DPO on one GPU, every role sharing one frozen base."""

__version__ = "0.1.0"
