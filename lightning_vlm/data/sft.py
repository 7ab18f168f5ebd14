"""Supervised fine-tuning data: chat conversations with images, loss on assistant tokens only."""

from __future__ import annotations

from lightning_vlm.data.base import VLMDataModule
from lightning_vlm.data.collate import SFTCollator, render
from lightning_vlm.data.rows import BadRowError, count_image_parts


class SFTDataModule(VLMDataModule):
    """Rows ``{"images": [...], "messages": [...]}`` in the chat format (docs/data.md).

    Images may appear in any user turn, several per row; the loss covers every assistant turn.
    Validation batches also carry generation prompts (the conversation minus its last reply) so
    the objective can report exact-match accuracy of the generated answer.
    """

    required = ("messages", "images")

    def _check_row(self, row: dict) -> int:
        messages, i = row["messages"], row["__row"]
        n_images = count_image_parts(messages, i, "messages")
        if messages[-1].get("role") != "assistant":
            raise BadRowError(f"row {i}: field 'messages': the last message must be the assistant's reply")
        self.check_replies(messages, i, "messages")
        images = self.images_of(row, n_images, "messages")
        return self.token_length(render(self.processor, messages), images)

    def _collator(self, split: str) -> SFTCollator:
        return SFTCollator(self.processor, with_prompts=split != "train")
