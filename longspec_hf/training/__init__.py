"""Draft training: data, Anchor-Offset position ids, lag noise, distillation from the target."""
