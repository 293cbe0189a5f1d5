//! Building blocks of the fault campaign: network namespaces with breakable links, an
//! NBD client, the self-describing workload and its ledger, and the
//! checks of replicas against the ledger.

pub mod check;
pub mod ledger;
pub mod nbd_client;
pub mod netns;
pub mod workload;
