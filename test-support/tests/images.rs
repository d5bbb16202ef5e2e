//! Copies of a server's state for benchmarks that repeat one setup: a `nats-server` started
//! from another's store, a database created from another as a template.

use parley_test_support::{NatsServer, TestDb};

#[tokio::test]
async fn a_server_started_from_an_image_holds_its_messages_and_copies_do_not_share_them() {
    let mut image = NatsServer::start().await;
    let js = async_nats::jetstream::new(async_nats::connect(image.url()).await.unwrap());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: "IMG".into(),
        subjects: vec!["img.>".into()],
        ..Default::default()
    })
    .await
    .unwrap();
    for i in 0..3 {
        js.publish(format!("img.{i}"), "x".into())
            .await
            .unwrap()
            .await
            .unwrap();
    }
    image.kill();

    let a = NatsServer::start_from(image.store()).await;
    let b = NatsServer::start_from(image.store()).await;
    let js_a = async_nats::jetstream::new(async_nats::connect(a.url()).await.unwrap());
    let js_b = async_nats::jetstream::new(async_nats::connect(b.url()).await.unwrap());
    js_a.publish("img.more", "y".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let count = |js: async_nats::jetstream::Context| async move {
        js.get_stream("IMG")
            .await
            .unwrap()
            .info()
            .await
            .unwrap()
            .state
            .messages
    };
    assert_eq!(count(js_a).await, 4);
    assert_eq!(count(js_b).await, 3, "a copy shares nothing with another");
}

#[tokio::test]
async fn a_database_created_from_a_template_holds_its_rows_and_not_later_ones() {
    let template = TestDb::create().await;
    let pool = template.pool().await;
    sqlx::query("CREATE TABLE t (n int)")
        .execute(&pool)
        .await
        .unwrap();
    sqlx::query("INSERT INTO t VALUES (1), (2)")
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;

    let copy = TestDb::create_from(&template).await;
    let copied = copy.pool().await;
    sqlx::query("INSERT INTO t VALUES (3)")
        .execute(&copied)
        .await
        .unwrap();
    let sum: i64 = sqlx::query_scalar("SELECT sum(n) FROM t")
        .fetch_one(&copied)
        .await
        .unwrap();
    assert_eq!(sum, 6);
    let again = TestDb::create_from(&template).await;
    let sum: i64 = sqlx::query_scalar("SELECT sum(n) FROM t")
        .fetch_one(&again.pool().await)
        .await
        .unwrap();
    assert_eq!(sum, 3, "the template kept its own rows only");
}
