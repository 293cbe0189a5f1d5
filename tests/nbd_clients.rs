//! Integration tests with real NBD clients: qemu-io, qemu-img, nbdinfo, nbdcopy and fio's
//! nbd engine, each against `serve_unix` on a socket in a temporary directory. A test
//! whose tool is not installed prints `SKIPPED` and why, and passes.

#[path = "nbd_common/mod.rs"]
mod common;

use common::{Server, have, pattern, run};
use tokio::process::Command;

const MIB: usize = 1 << 20;

fn stdout(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_patterns_zeroes_discard_flush_fua() {
    if !have("qemu-io", "qemu_io_patterns_zeroes_discard_flush_fua").await {
        return;
    }
    let server = Server::start(16 * MIB).await;
    let uri = server.uri("disk");
    let out = run(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "write -P 0xab 0 64k",
        "-c",
        "read -P 0xab 0 64k",
        "-c",
        "write -f -P 0xcd 64k 64k",
        "-c",
        "aio_write -P 0x11 1M 256k",
        "-c",
        "aio_write -P 0x22 2M 256k",
        "-c",
        "aio_write -P 0x33 3M 4k",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x11 1M 256k",
        "-c",
        "read -P 0x22 2M 256k",
        "-c",
        "read -P 0x33 3M 4k",
        "-c",
        "write -P 0x44 4M 1M",
        "-c",
        "write -z 4M 512k",
        "-c",
        "read -P 0 4M 512k",
        "-c",
        "read -P 0x44 4608k 512k",
        "-c",
        "discard 3M 4k",
        "-c",
        "flush",
        "-c",
        "write -P 0x55 16383k 1k",
        "-c",
        "read -P 0x55 16383k 1k",
    ]))
    .await;
    let text = stdout(&out);
    assert!(!text.contains("failed"), "qemu-io reported a failure:\n{text}");
    assert!(!text.contains("error"), "qemu-io reported an error:\n{text}");

    let d = server.device.snapshot();
    assert!(d[..64 * 1024].iter().all(|&b| b == 0xab));
    assert!(d[64 * 1024..128 * 1024].iter().all(|&b| b == 0xcd));
    assert!(d[MIB..MIB + 256 * 1024].iter().all(|&b| b == 0x11));
    assert!(d[2 * MIB..2 * MIB + 256 * 1024].iter().all(|&b| b == 0x22));
    assert!(d[4 * MIB..4 * MIB + 512 * 1024].iter().all(|&b| b == 0));
    assert!(d[4 * MIB + 512 * 1024..5 * MIB].iter().all(|&b| b == 0x44));
    assert!(d[16 * MIB - 1024..].iter().all(|&b| b == 0x55));

    // Past the end: qemu refuses it itself or the server errors; either way no success.
    let out = Command::new("qemu-io").args(["-f", "raw", &uri, "-c", "read 16M 4k"]).output().await.unwrap();
    let text = stdout(&out) + &String::from_utf8_lossy(&out.stderr);
    assert!(!text.contains("read 4096/4096 bytes"), "read past the end succeeded:\n{text}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_io_over_tcp_loopback() {
    if !have("qemu-io", "qemu_io_over_tcp_loopback").await {
        return;
    }
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let device = std::sync::Arc::new(common::MemDevice::new(8 * MIB));
    let exports = std::sync::Arc::new(common::OneExport {
        name: "disk".into(),
        description: String::new(),
        device: device.clone(),
    });
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(peersan_node_agent::nbd::serve_tcp(listener, exports, stopped));
    let uri = format!("nbd://127.0.0.1:{port}/disk");
    let out = run(Command::new("qemu-io").args(["-f", "raw", &uri]).args([
        "-c",
        "aio_write -P 0x5a 0 1M",
        "-c",
        "aio_write -P 0xa5 1M 1M",
        "-c",
        "aio_flush",
        "-c",
        "read -P 0x5a 0 1M",
        "-c",
        "read -P 0xa5 1M 1M",
    ]))
    .await;
    let text = stdout(&out);
    assert!(!text.contains("failed"), "qemu-io reported a failure:\n{text}");
    let d = device.snapshot();
    assert!(d[..MIB].iter().all(|&b| b == 0x5a) && d[MIB..2 * MIB].iter().all(|&b| b == 0xa5));
    stop.send(()).unwrap();
    server.await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_img_convert_and_compare() {
    if !have("qemu-img", "qemu_img_convert_and_compare").await {
        return;
    }
    let size = 24 * MIB;
    let server = Server::start(size).await;
    // Pre-existing garbage where the image has zeros: convert must overwrite it.
    server.device.set(&vec![0xee; size]);
    let uri = server.uri("disk");

    // An image with data, a long run of zeros, and unaligned bits.
    let mut image = pattern(size, 1);
    image[4 * MIB..12 * MIB].fill(0);
    image[20 * MIB + 17..20 * MIB + 4000].fill(0);
    let src = server.dir.path().join("src.img");
    std::fs::write(&src, &image).unwrap();

    run(Command::new("qemu-img")
        .args(["convert", "-n", "-f", "raw", "-O", "raw", "-W", "-m", "8"])
        .arg(&src)
        .arg(&uri))
    .await;
    assert!(server.device.snapshot() == image, "device differs from the image after convert");
    run(Command::new("qemu-img").args(["compare", "-f", "raw", "-F", "raw"]).arg(&src).arg(&uri)).await;

    // And back out.
    let dst = server.dir.path().join("dst.img");
    run(Command::new("qemu-img").args(["convert", "-f", "raw", "-O", "raw", &uri]).arg(&dst)).await;
    assert!(std::fs::read(&dst).unwrap() == image, "image read back differs");

    // compare notices a difference.
    server.device.set(&[1, 2, 3]);
    let out = Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(&src)
        .arg(&uri)
        .output()
        .await
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "compare should report a difference");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdinfo_reports_size_flags_block_sizes_and_list() {
    if !have("nbdinfo", "nbdinfo_reports_size_flags_block_sizes_and_list").await {
        return;
    }
    let server = Server::start(16 * MIB).await;
    let out = run(Command::new("nbdinfo").args(["--json", &server.uri("disk")])).await;
    let json: String = stdout(&out).split_whitespace().collect();
    for expected in [
        "\"export-size\":16777216",
        "\"protocol\":\"newstyle-fixed\"",
        "\"description\":\"peersantestdisk\"",
        "\"is_read_only\":false",
        "\"can_flush\":true",
        "\"can_fua\":true",
        "\"can_trim\":true",
        "\"can_zero\":true",
        "\"can_multi_conn\":true",
        "\"block_size_minimum\":1",
        "\"block_size_preferred\":4096",
        "\"block_size_maximum\":33554432",
    ] {
        assert!(json.contains(expected), "missing {expected} in {json}");
    }
    // The default export, and the export list.
    let out = run(Command::new("nbdinfo").args(["--size", &server.uri("")])).await;
    assert_eq!(stdout(&out).trim(), "16777216");
    let out = run(Command::new("nbdinfo").args(["--list", "--json", &server.uri("")])).await;
    let json: String = stdout(&out).split_whitespace().collect();
    assert!(json.contains("\"export-name\":\"disk\""), "{json}");
    // A missing export is an error.
    let out = Command::new("nbdinfo").arg(server.uri("nope")).output().await.unwrap();
    assert!(!out.status.success());
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nbdcopy_in_and_out_with_multi_conn() {
    if !have("nbdcopy", "nbdcopy_in_and_out_with_multi_conn").await {
        return;
    }
    let size = 32 * MIB;
    let server = Server::start(size).await;
    let mut image = pattern(size, 7);
    image[8 * MIB..9 * MIB].fill(0);
    let src = server.dir.path().join("src.img");
    std::fs::write(&src, &image).unwrap();
    let uri = server.uri("disk");

    // Several connections (the export advertises multi-conn) and many requests each.
    run(Command::new("nbdcopy").args(["--connections=4", "--requests=32", "--flush"]).arg(&src).arg(&uri)).await;
    assert!(server.device.snapshot() == image, "device differs after nbdcopy");

    let dst = server.dir.path().join("dst.img");
    std::fs::File::create(&dst).unwrap();
    run(Command::new("nbdcopy").args(["--connections=2", &uri]).arg(&dst)).await;
    assert!(std::fs::read(&dst).unwrap() == image, "copy read back differs");
    server.stop().await;
}

/// Runs fio with the nbd engine and asserts it succeeded without errors.
async fn fio(server: &Server, name: &str, args: &[&str]) {
    let output = server.dir.path().join(format!("{name}.json"));
    // fio leaves verify state files in its working directory.
    let out = run(Command::new("fio")
        .current_dir(server.dir.path())
        .arg(format!("--name={name}"))
        .args(["--ioengine=nbd", &format!("--uri={}", server.uri("disk"))])
        .args(["--output-format=json", "--verify_fatal=1"])
        .arg(format!("--output={}", output.display()))
        .args(args))
    .await;
    let json: String = std::fs::read_to_string(&output)
        .unwrap_or_else(|e| panic!("no fio output ({e}): {}", stdout(&out)))
        .split_whitespace()
        .collect();
    let errors: Vec<&str> = json.split("\"error\":").skip(1).collect();
    assert!(!errors.is_empty(), "no job results in fio output: {json}");
    for e in errors {
        assert!(
            e.starts_with('0') && !e[1..].starts_with(|c: char| c.is_ascii_digit()),
            "fio reported an error: {json}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_randwrite_4k_qd32_verify() {
    if !have("fio", "fio_randwrite_4k_qd32_verify").await {
        return;
    }
    let server = Server::start(64 * MIB).await;
    fio(&server, "randwrite", &["--rw=randwrite", "--bs=4k", "--iodepth=32", "--size=64M", "--verify=crc32c"]).await;
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_mixed_sizes_verify_and_two_connections() {
    if !have("fio", "fio_mixed_sizes_verify_and_two_connections").await {
        return;
    }
    let server = Server::start(128 * MIB).await;
    // Mixed request sizes, up to 4 MiB, deep queue.
    fio(
        &server,
        "mixed",
        &[
            "--rw=randwrite",
            "--bssplit=512/10:4k/30:16k/20:64k/20:256k/10:1m/5:4m/5",
            "--iodepth=32",
            "--size=128M",
            "--verify=crc32c",
        ],
    )
    .await;
    // Mixed reads and writes of unaligned sizes (no verify: reads race with writes).
    fio(
        &server,
        "randrw",
        &["--rw=randrw", "--bsrange=512-192k", "--blockalign=512", "--iodepth=32", "--size=128M", "--io_size=64M"],
    )
    .await;
    // Two jobs, so two connections, each verifying its own half.
    fio(
        &server,
        "twoconn",
        &[
            "--rw=randwrite",
            "--bs=16k",
            "--iodepth=16",
            "--numjobs=2",
            "--size=64M",
            "--offset_increment=64M",
            "--verify=crc32c",
        ],
    )
    .await;
    server.stop().await;
}
