"""The shipped mergekit configs (YAML files beside this one), installed as package data so that
`varm-merge config NAME` finds them in any installation."""
