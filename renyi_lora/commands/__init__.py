"""The commands wing: one module per ``renyi-lora`` command (its flags, ``run_*``, printing and reports).

Library modules never import from here; ``renyi_lora.cli`` dispatches to these modules.
"""
