"""Data: TRL's record formats and their validation (``records``), where data comes from (``sources``: files,
``datasets`` objects, folders, hub ids), SFT tokenisation and collation (``sft``) and preference pairs
(``preference``). Imports the core only."""
