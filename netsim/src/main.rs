//! `netsim`: see the crate documentation of `mesh_netsim`.

fn main() {}
