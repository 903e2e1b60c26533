"""The store on Ray: shard actors, a named coordinator per store, bring-up and discovery."""
