"""Applying SPMs to a UNet: the session (hooks), gating (Facilitated Transport), the low-rank math, moderation policy, gate reports."""
