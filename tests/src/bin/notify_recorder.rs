//! Benchmark helper: serves `org.freedesktop.Notifications` on the session bus given by
//! `DBUS_SESSION_BUS_ADDRESS` and prints one line per notification shown:
//! `<unix time in seconds, microsecond precision> <summary>`.

use std::io::Write;

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let Ok(address) = std::env::var("DBUS_SESSION_BUS_ADDRESS") else {
        eprintln!("sharefs-bench-notify-recorder: DBUS_SESSION_BUS_ADDRESS is not set");
        std::process::exit(2);
    };
    let bus = sharefs_tests::desktop::BusAddress(address);
    let _server = sharefs_tests::desktop::NotificationServer::start_at(&bus, |summary| {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{now:.6} {summary}");
        let _ = out.flush();
    })
    .await;
    println!("ready");
    std::future::pending::<()>().await;
}
