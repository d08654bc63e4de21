"""Shared pieces of the fake adapters the task tests use."""
from tasks.requests import Generates


class EncodesInline(Generates):
    """The encode / generate_encoded split of a real adapter, for a fake that only generates."""

    def encode(self, images, prompts):
        return images, prompts

    def generate_encoded(self, encoded, generation):
        return self.generate(*encoded, generation)
