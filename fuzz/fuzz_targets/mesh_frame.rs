//! The mesh frame decoder: a stream's protocol byte, then frames decoded as the message
//! type that protocol's service reads. Every outcome must be a value or a typed error; a
//! decoded message must encode again.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use shoal_agent::mesh::frame::{self, Protocol};

static RUNTIME: LazyLock<tokio::runtime::Runtime> = LazyLock::new(|| {
    tokio::runtime::Builder::new_current_thread()
        .build()
        .unwrap()
});

async fn frames<T>(mut r: &[u8])
where
    T: serde::de::DeserializeOwned + serde::Serialize,
{
    for _ in 0..4 {
        match frame::read_frame::<T>(&mut r).await {
            Ok(body) => {
                let _ = frame::encode_frame(&body);
            }
            Err(_) => return,
        }
    }
}

fuzz_target!(|data: &[u8]| {
    RUNTIME.block_on(async {
        let mut r = data;
        let Ok(protocol) = frame::read_protocol(&mut r).await else {
            return;
        };
        match protocol {
            Protocol::Gossip => frames::<shoal_agent::mesh::hoststate::GossipMsg>(r).await,
            Protocol::Api => frames::<shoal_agent::api::Request>(r).await,
            Protocol::Blobs => frames::<shoal_agent::blobs::BlobRequest>(r).await,
            Protocol::Revocations => frames::<Vec<u8>>(r).await,
            Protocol::Fleet => frames::<shoal_agent::fleet::wire::FleetRequest>(r).await,
            Protocol::Raft => frames::<Vec<u8>>(r).await,
        }
    });
});
