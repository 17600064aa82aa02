"""The package's import graph has no cycle (the layer contracts themselves are `lint-imports`'s, in CI)."""

import grimp


def test_no_module_imports_one_that_imports_it_back():
    graph = grimp.build_graph("mixtral_jax", exclude_type_checking_imports=True)
    cycles = [chain for module in sorted(graph.modules) for imported in graph.find_modules_directly_imported_by(module)
              if (chain := graph.find_shortest_chain(importer=imported, imported=module))]
    assert len(graph.modules) > 40 and cycles == []
