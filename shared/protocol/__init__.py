"""Request and response models mirroring the OpenAI API (https://platform.openai.com/docs/api-reference)."""
