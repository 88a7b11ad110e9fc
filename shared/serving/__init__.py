"""The request path behind each function: one module per endpoint builds the prompt, submits the sequences
and formats the answer (JSON or a stream of chunks). These are the engine's only callers; the handlers in
`functions/` parse a request and hand it here."""
