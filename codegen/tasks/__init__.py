"""Task-kind bodies of the megakernel: @triton.jit device functions the templates call."""
