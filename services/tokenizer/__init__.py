"""The tokenizer service (``python -m services.tokenizer``): ``pdmesh.v1.TokenizerService``
over ``pdmesh.tokenizer`` — tokenize, chat templates, (streaming) detokenization."""
