"""The study files shipped with ancra-tune: `ancra-tune sweep quickstart` resolves a name to one of them."""
