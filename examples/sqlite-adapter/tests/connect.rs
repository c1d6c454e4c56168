//! Opening the transport: by URL through a `Registry`, and precise configuration errors.

use evbus::{ErrorKind, Event, SubscribeOptions, Transport};
use evbus_example_sqlite::{connect, connector};

#[tokio::test]
async fn a_registry_with_the_connector_opens_sqlite_example_urls() -> evbus::Result<()> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let url = format!("sqlite-example://{}", dir.path().join("app.db").display());
    let mut registry = evbus::Registry::new(); // knows memory://
    registry.register(connector());
    let transport = registry.connect(&url).await?;
    assert_eq!(transport.name(), "sqlite-example");

    let topic = transport.topic("orders").await?;
    let mut billing = topic.subscribe(SubscribeOptions::named("billing")).await?;
    topic
        .publish(&Event::builder("orderPlaced", "/shop").build()?)
        .await?;
    let delivery = billing.next_delivery().await.expect("one delivery")?;
    assert_eq!(delivery.event().ty(), "orderPlaced");
    delivery.ack().await?;
    transport.close().await
}

#[tokio::test]
async fn a_malformed_url_is_a_configuration_error_naming_the_expected_form() {
    for url in [
        "sqlite-example://",
        "sqlite-example://somehost/tmp/x.db",
        "sqlite-example:///tmp/x.db?mode=fast",
        "sqlite:///tmp/x.db",
        "not a url",
    ] {
        let err = connect(url).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{url}: {err}");
    }
    // A relative path: the form asks for an absolute one.
    let err = connect("sqlite-example:relative.db").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    let err = connect("sqlite-example://h/x.db").await.unwrap_err();
    assert!(
        err.message().contains("sqlite-example:///path/to/file.db"),
        "{err}"
    );
}

#[tokio::test]
async fn a_file_that_cannot_be_opened_is_a_configuration_error_not_an_outage() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let missing = dir.path().join("no-such-directory").join("x.db");
    let err = connect(&format!("sqlite-example://{}", missing.display()))
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
}

#[tokio::test]
async fn the_path_is_percent_decoded() -> evbus::Result<()> {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let file = dir.path().join("my dir").join("x 1.db");
    std::fs::create_dir(dir.path().join("my dir")).expect("a directory with a space");
    // The URL parser writes the spaces as `%20`; the file opened has them back.
    let transport = connect(&format!("sqlite-example://{}", file.display())).await?;
    transport.close().await?;
    assert!(file.exists(), "{} was not created", file.display());
    Ok(())
}
