//! The QUIC transport with real endpoints on 127.0.0.x: fleet peers connect and know each
//! other's name and role; a certificate from another CA is refused both ways; a garbage
//! frame kills only its stream, garbage datagrams nothing.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use shoal_agent::identity::{self, Identity, Role};
use shoal_agent::mesh::frame::{read_frame, write_frame};
use shoal_agent::mesh::transport;

#[derive(Serialize, Deserialize, Debug, PartialEq)]
enum Msg {
    Ping,
    Pong { you_are: String },
}

fn identities(dir: &Path, ca: &str, names: &[(&str, Role)]) -> Vec<Identity> {
    let ca_dir = dir.join(ca);
    identity::init_ca(&ca_dir).unwrap();
    names
        .iter()
        .map(|(name, role)| {
            let out = dir.join(format!("{ca}-{name}"));
            identity::issue(&ca_dir, name, *role, &out).unwrap();
            Identity::load(&out).unwrap()
        })
        .collect()
}

/// Answers every frame with a Pong naming the caller; resets a stream that sends a bad frame.
fn serve(endpoint: quinn::Endpoint) {
    tokio::spawn(async move {
        while let Some(incoming) = endpoint.accept().await {
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let (name, _) = transport::peer_identity(&conn).unwrap();
                while let Ok((mut send, mut recv)) = conn.accept_bi().await {
                    let name = name.clone();
                    tokio::spawn(async move {
                        match read_frame::<Msg>(&mut recv).await {
                            Ok(Msg::Ping) => {
                                write_frame(&mut send, &Msg::Pong { you_are: name })
                                    .await
                                    .unwrap();
                                let _ = send.finish();
                            }
                            _ => {
                                let _ = send.reset(1u32.into());
                            }
                        }
                    });
                }
            });
        }
    });
}

async fn ping(conn: &quinn::Connection) -> anyhow::Result<Msg> {
    let (mut send, mut recv) = conn.open_bi().await?;
    write_frame(&mut send, &Msg::Ping).await?;
    send.finish()?;
    Ok(tokio::time::timeout(Duration::from_secs(5), read_frame::<Msg>(&mut recv)).await??)
}

fn addr(ip: &str) -> SocketAddr {
    format!("{ip}:0").parse().unwrap()
}

#[tokio::test]
async fn fleet_peers_connect_and_strangers_do_not() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = identities(
        dir.path(),
        "fleet",
        &[
            ("edge-1", Role::Agent),
            ("edge-2", Role::Agent),
            ("alice", Role::Operator),
        ],
    );
    let other = identities(dir.path(), "other", &[("mallory", Role::Agent)]);

    let server = transport::endpoint(addr("127.0.0.2"), &fleet[0], None).unwrap();
    let server_addr = server.local_addr().unwrap();
    serve(server.clone());

    // A fleet agent and a fleet operator connect; each side knows who the other is.
    for (client_id, name) in [(&fleet[1], "edge-2"), (&fleet[2], "alice")] {
        let client = transport::endpoint(addr("127.0.0.1"), client_id, None).unwrap();
        let conn = transport::connect(&client, server_addr).await.unwrap();
        assert_eq!(
            transport::peer_identity(&conn).unwrap(),
            ("edge-1".to_string(), Role::Agent)
        );
        assert_eq!(
            ping(&conn).await.unwrap(),
            Msg::Pong {
                you_are: name.into()
            }
        );
    }

    // A client with a certificate from another CA is refused by the server.
    let stranger = transport::endpoint(addr("127.0.0.1"), &other[0], None).unwrap();
    let refused = match transport::connect(&stranger, server_addr).await {
        Err(e) => Some(e),
        // With TLS 1.3 the client may finish before the server rejects its certificate:
        // then the first exchange fails.
        Ok(conn) => ping(&conn).await.err(),
    };
    assert!(
        refused.is_some(),
        "a stranger's client certificate was accepted"
    );

    // A fleet client refuses a server with a certificate from another CA.
    let rogue = transport::endpoint(addr("127.0.0.3"), &other[0], None).unwrap();
    let rogue_addr = rogue.local_addr().unwrap();
    serve(rogue);
    let client = transport::endpoint(addr("127.0.0.1"), &fleet[1], None).unwrap();
    let err = transport::connect(&client, rogue_addr)
        .await
        .expect_err("a rogue server was accepted");
    assert!(
        format!("{err:#}").to_lowercase().contains("certificate"),
        "{err:#}"
    );
}

#[tokio::test]
async fn garbage_frames_and_datagrams_do_not_hurt_the_endpoint() {
    let dir = tempfile::tempdir().unwrap();
    let fleet = identities(
        dir.path(),
        "fleet",
        &[("edge-1", Role::Agent), ("edge-2", Role::Agent)],
    );
    let server = transport::endpoint(addr("127.0.0.4"), &fleet[0], None).unwrap();
    let server_addr = server.local_addr().unwrap();
    serve(server);

    // Garbage UDP datagrams at the QUIC port.
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    for n in 0..200u32 {
        let junk: Vec<u8> = (0..(n % 1200 + 1)).map(|i| (i * 31 + n) as u8).collect();
        udp.send_to(&junk, server_addr).unwrap();
    }

    let client = transport::endpoint(addr("127.0.0.1"), &fleet[1], None).unwrap();
    let conn = transport::connect(&client, server_addr).await.unwrap();

    // A garbage frame: that stream is reset...
    for junk in [
        &[0xff, 0xff, 0xff, 0xff][..],
        &[0, 0, 0, 3, 1, 0x7f, 0x7f][..],
        &[0, 0, 0, 2, 42, 0][..],
    ] {
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(junk).await.unwrap();
        send.finish().unwrap();
        let answer = tokio::time::timeout(Duration::from_secs(5), read_frame::<Msg>(&mut recv))
            .await
            .unwrap();
        assert!(answer.is_err(), "a garbage frame got an answer: {answer:?}");
    }
    // ...and the connection, and the endpoint, go on serving.
    assert_eq!(
        ping(&conn).await.unwrap(),
        Msg::Pong {
            you_are: "edge-2".into()
        }
    );
    let again = transport::connect(&client, server_addr).await.unwrap();
    assert_eq!(
        ping(&again).await.unwrap(),
        Msg::Pong {
            you_are: "edge-2".into()
        }
    );
}
