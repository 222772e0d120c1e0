"""The sub-commands of ``bayprano``, one module per group; ``bayprano.cli`` assembles them into one parser."""
